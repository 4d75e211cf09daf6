"""Every state change of the access workflow. Views, admin, API and tasks call these."""
