"""The napari front end: reader, sample data and (later) dock widgets.

Only this package and ``cli`` talk to users; the core stays napari-free.
"""
