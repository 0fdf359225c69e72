"""Sound bounds on margins over weight boxes.

`ibp` is our own interval engine (exact interval products, float64 proof mode with a rounding
allowance); `lirpa` wraps auto_LiRPA (imported only when used); `combined` picks per method.
"""
