"""Schemathesis hooks for lunafront's conformance run (tests/conformance.rs).

The document (api/openapi.yaml) says a registration's `csr` is `format: pkcs10-pem`: a PEM
PKCS#10 request whose signature verifies. No generator can make one from a pattern, so this
teaches Schemathesis the format with real requests, made by the test (rcgen, no name: valid for
any agent) and named by LUNAFRONT_CONFORMANCE_CSRS (a file of PEM blocks).
"""

import os

import schemathesis
from hypothesis import strategies as st

_END = "-----END CERTIFICATE REQUEST-----\n"

with open(os.environ["LUNAFRONT_CONFORMANCE_CSRS"], encoding="ascii") as f:
    _CSRS = [block + _END for block in f.read().split(_END) if block.strip()]

assert _CSRS, "no CSR in LUNAFRONT_CONFORMANCE_CSRS"
schemathesis.openapi.format("pkcs10-pem", st.sampled_from(_CSRS))
