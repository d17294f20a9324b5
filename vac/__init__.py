"""VAC: Variable Allocation Compression.

Structural compression of causal LMs: every target ``nn.Linear`` W (m x n) becomes
``up`` (m x r) @ ``down`` (r x n), with ranks chosen under a global parameter budget and
factors fitted with loss-aware weighted SVDs. See README.md and DESIGN notes.
"""

from vac.errors import VacError

__version__ = "0.1.0"
__all__ = ["VacError", "__version__"]
