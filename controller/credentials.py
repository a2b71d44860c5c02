"""Who may register, and the broker credentials a registered agent gets.

With an enrolment token configured, a registration that creates an agent must
carry that token; an agent that is known already must prove itself with its
own MQTT password instead. The token alone is not enough for a known id: it
would hand whoever holds the token any agent's credentials. With open
enrolment (a lab) anyone may register and no credentials are issued.

Credentials are derived, not stored: an agent's MQTT password is
``schemas.access.mqtt_password(agent_secret, agent_id)``, so the embedded
broker checks it with the same secret and no list of agents. Rotating the
agent secret changes every password at once; agents then register again with
the enrolment token under a new id (see the README, "Security").
"""

from dataclasses import dataclass

from schemas.access import mqtt_password, same_secret
from schemas.messages import RegisterRequest

MQTT_USERNAME = "mqtt_username"
MQTT_PASSWORD = "mqtt_password"


class EnrolmentRefused(Exception):
    """A registration without the right token or password."""


@dataclass(frozen=True, slots=True)
class Enrolment:
    #: None: open enrolment, anyone may register.
    token: str | None
    #: None: no broker credentials are issued.
    agent_secret: str | None

    @property
    def open(self) -> bool:
        return self.token is None

    def admit(self, request: RegisterRequest, known: bool) -> None:
        """Raise ``EnrolmentRefused`` unless ``request`` may register.

        ``known``: the request names an agent id that is registered already.
        The messages never repeat what the request sent.
        """
        if self.token is None:
            return
        if known:
            assert request.agent_id is not None
            if self.agent_secret is not None and same_secret(
                request.mqtt_password,
                mqtt_password(self.agent_secret, request.agent_id),
            ):
                return
            raise EnrolmentRefused(
                f"agent {request.agent_id!r} is registered already: register again "
                "with its own MQTT password (mqtt_password), not the enrolment token."
            )
        if not same_secret(request.enrolment_token, self.token):
            raise EnrolmentRefused(
                "registration needs the operator's enrolment token (enrolment_token); "
                "it was missing or wrong."
            )

    def credentials(self, agent_id: str) -> dict[str, str] | None:
        """The broker account of ``agent_id``, or None when none are issued."""
        if self.token is None or self.agent_secret is None:
            return None
        return {
            MQTT_USERNAME: agent_id,
            MQTT_PASSWORD: mqtt_password(self.agent_secret, agent_id),
        }
