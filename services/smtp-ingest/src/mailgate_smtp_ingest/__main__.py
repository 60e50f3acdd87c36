from mailgate_core.runtime import run_service

from .app import Settings, build


def main() -> None:
    run_service("smtp-ingest", Settings, build)


if __name__ == "__main__":
    main()
