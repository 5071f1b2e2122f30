"""What the tests share, imported by name (``from tests.helpers.models import make``). Test modules and
conftests import from here, never from a test module or a conftest (tests/test_layout.py checks it).

- ``models``: tiny backbones of every family with random weights, and their weight files.
- ``deltas``: tuned models, their delta files, the folded reference.
- ``images``: Pillow-encoded images and tiny image folders.
- ``stores``: an in-memory TaskStore.
- ``engines``: the fake engine behind the HTTP tests; ``real_engine``: the real one on test_vit.
- ``api``: the admin token, small-limit settings and the error shape.
- ``servers``: ssf-serve and redis-server subprocesses; ``ports``: free loopback ports.
- ``load``: a bounded load driver that records every answer.
"""
