"""Measurements beside the drift: the null noise floor, gradient ICS."""
