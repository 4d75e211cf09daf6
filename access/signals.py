"""Events other apps subscribe to (weights issues links on grant_created and kills them on
grant_revoked). Sent after commit, with ids only; receivers call their own services."""

from django.dispatch import Signal

grant_created = Signal()  # kwargs: grant_id
grant_revoked = Signal()  # kwargs: grant_id
