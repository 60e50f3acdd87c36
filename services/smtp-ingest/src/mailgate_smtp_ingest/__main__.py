from mailgate_core.config import ConfigError, load_settings
from mailgate_core.logging import configure_logging
from mailgate_core.runtime import run_service

from .app import Settings, SmtpIngestService, build
from .memory import settle_heap


async def build_process(settings: Settings) -> SmtpIngestService:
    """``build`` for an smtp-ingest process of its own (tests start services in-process
    with ``build``): once it has started, the heap is settled (``memory.settle_heap``)."""
    service = await build(settings)

    async def settle() -> None:
        settle_heap()

    service.on_start.append(settle)
    return service


def main() -> None:
    try:
        settings = load_settings(Settings)
    except ConfigError:
        settings = None  # run_service reports it and exits 2
    if settings is not None and settings.smtp_workers > 1 and not settings.smtp_worker_index:
        from .workers import supervise

        configure_logging("smtp-ingest", settings.log_level)
        raise SystemExit(
            supervise(
                settings.smtp_workers,
                ops_port=settings.ops_port,
                grace_s=settings.shutdown_grace_s,
            )
        )
    run_service("smtp-ingest", Settings, build_process)


if __name__ == "__main__":
    main()
