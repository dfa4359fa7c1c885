"""distswitch: switcher networks that prune task networks, trained distributed."""
