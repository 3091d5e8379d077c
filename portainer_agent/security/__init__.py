"""Who may use the agent: Portainer request signatures and the security shutdown.

* :mod:`~portainer_agent.security.signature`: pure parsing/verification of the headers;
* :mod:`~portainer_agent.security.notary`: the association policy (default vs secret mode);
* :mod:`~portainer_agent.security.guard`: the HTTP seam used by the root resource;
* :mod:`~portainer_agent.security.shutdown`: close an unclaimed API after a timeout;
* :mod:`~portainer_agent.security.body`: drop bodies of unauthenticated requests;
* :mod:`~portainer_agent.security.testing`: client CA and certificates for mTLS tests.
"""
from portainer_agent.security.body import DiscardUnauthenticatedBody
from portainer_agent.security.guard import SignatureGuard
from portainer_agent.security.notary import Notary
from portainer_agent.security.shutdown import SecurityShutdown
from portainer_agent.security.signature import SignatureError, SignatureInvalid, SignatureMissing

__all__ = [
    "DiscardUnauthenticatedBody",
    "Notary",
    "SecurityShutdown",
    "SignatureError",
    "SignatureGuard",
    "SignatureInvalid",
    "SignatureMissing",
]
