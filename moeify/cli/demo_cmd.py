"""`moeify demo`: the whole path on a real model, offline, in a few minutes on a laptop CPU."""
