"""Deprecated alias of `gpumesh.sdk`, kept for one release: `import shared.sdk` is that module.

The SDK moved to the `gpumesh` package (`from gpumesh import Client`). This name is the
very same module object, so attributes set or patched through either name are seen
through both. It will be removed in the next release.
"""

import sys

import gpumesh.sdk

sys.modules[__name__] = gpumesh.sdk
