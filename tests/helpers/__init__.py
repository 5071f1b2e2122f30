"""What the tests share, imported by name (``from tests.helpers.models import make``): tiny models, deltas,
images, stores, servers and ports. Test modules and conftests import from here, never from each other."""
