"""Imported at the start of every Python process the test suite starts (tests/conftest.py puts this
folder first on PYTHONPATH): one harmless line on stderr, so that no test can assert a whole stderr."""
import sys

try:
    sys.stderr.write('tests/conftest.py: a harmless start-up line on stderr, as another package may print\n')
    sys.stderr.flush()
except (AttributeError, OSError):  # no stderr, or one already closed
    pass
