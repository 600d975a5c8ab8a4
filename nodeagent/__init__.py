from nodeagent import accel as _accel

_accel.install()  # the compiled request path when it matches the sources (nodeagent/accel.py)
