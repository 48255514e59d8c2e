"""``konnectivity-fast doctor``: checks of a deployment from outside."""
