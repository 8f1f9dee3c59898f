"""The human-study kit: blinded feature cards out, ratings in, agreement."""
