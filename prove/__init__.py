"""`make prove`: load, fault and hostile-input runs against a private, throw-away stack."""
