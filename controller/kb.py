"""The KB catalog: KB definition files shipped with the controller.

INTERFACE STUB, to be filled in.
"""

from pathlib import Path

from schemas.kb import KBDefinition
from schemas.views import KBView

BUILTIN_DIR = Path(__file__).parent / "kbs"


class KBCatalog:
    def __init__(self, kbs: dict[str, KBDefinition]) -> None:
        self.kbs = kbs

    @classmethod
    def load(cls, *dirs: Path) -> "KBCatalog":
        raise NotImplementedError

    def get(self, kb_id: str) -> KBDefinition | None:
        return self.kbs.get(kb_id)

    def views(self) -> list[KBView]:
        raise NotImplementedError
