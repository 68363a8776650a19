import os
import sys

# Let tests import their helpers module as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
