"""The pull worker for webhook deliveries: ``mailgate_core.flow.FlowWorker`` (standing pull
requests, lingering unconfirmed acks). It lives in libs since postal-sender uses it too."""

from mailgate_core.flow import FlowWorker

__all__ = ["FlowWorker"]
