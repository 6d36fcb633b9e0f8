"""``lens segment``, ``lens chat``, ``lens serve``: LENS for users, from the shell (registered in ``lens.cli``)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track

from lens.assets import SYNTHETIC_LENS

logger = logging.getLogger("lens")
console = Console(stderr=True)

CheckpointOption = Annotated[str, typer.Option(help="LENS checkpoint directory, lens: asset or hub id")]
DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps")]


def _pipeline(checkpoint: str, device: str):
    from lens.pipeline import LensPipeline

    with console.status(f"loading {checkpoint}"):
        return LensPipeline.from_pretrained(checkpoint, device=device)


def _emit(results: list, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps({**(extra or {}), "results": [r.to_dict() for r in results]}) + "\n")
        return
    for r in results:
        state = (
            f"present (p={r.presence:.2f})"
            if r.present and r.presence is not None
            else (
                "present"
                if r.present
                else "absent" + (f" (p={r.presence:.2f})" if r.presence is not None else "")
            )
        )
        logger.info("%r: %s, %d px, box %s", r.query, state, r.area, r.box)


def segment(
    image: Annotated[Path | None, typer.Argument(help="image file")] = None,
    queries: Annotated[list[str] | None, typer.Argument(help="what to segment (one or more)")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="mask PNG (first query)")] = None,
    overlay: Annotated[Path | None, typer.Option(help="overlay PNG (first query)")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print results as JSON (RLE masks) on stdout")
    ] = False,
    batch: Annotated[
        Path | None,
        typer.Option(help='JSON lines {"image": path, "queries": [...], "mask": optional out path}'),
    ] = None,
    checkpoint: CheckpointOption = SYNTHETIC_LENS,
    device: DeviceOption = "auto",
) -> None:
    """Segment what QUERIES ask for in IMAGE (or every request of --batch)."""
    if batch is not None:
        if image is not None:
            raise ValueError("give either IMAGE QUERY or --batch, not both")
        _segment_batch(batch, as_json, checkpoint, device)
        return
    if image is None or not queries:
        raise ValueError('usage: lens segment IMAGE "query" [...] (or --batch requests.jsonl)')
    from lens.images import load_image

    picture = load_image(image)  # a bad path or file fails before the models load
    pipe = _pipeline(checkpoint, device)
    results = pipe(picture, list(queries))
    if out is not None:
        results[0].save_mask(out)
        logger.info("mask: %s", out)
    if overlay is not None:
        overlay.parent.mkdir(parents=True, exist_ok=True)
        results[0].overlay().save(overlay)
        logger.info("overlay: %s", overlay)
    _emit(results, as_json, {"image": str(image)})


def _segment_batch(path: Path, as_json: bool, checkpoint: str, device: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no batch file at {path}")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            queries = item.get("queries") or [item["query"]]
            requests.append((Path(item["image"]), [str(q) for q in queries], item.get("mask")))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}:{number}: not a request line ({error})") from None
    pipe = _pipeline(checkpoint, device)
    for image, queries, mask_path in track(requests, description="segmenting", console=console):
        results = pipe(image, queries)
        if mask_path:
            results[0].save_mask(mask_path)
        _emit(results, as_json, {"image": str(image)})


def chat(
    image: Annotated[Path, typer.Argument(help="image to talk about")],
    checkpoint: CheckpointOption = SYNTHETIC_LENS,
    device: DeviceOption = "auto",
    overlays: Annotated[Path, typer.Option(help="where segmentation overlays are written")] = Path(
        "outputs/chat"
    ),
    save: Annotated[Path | None, typer.Option(help="save the conversation (JSON) on exit")] = None,
) -> None:
    """A terminal conversation with the agent: ask questions, ask it to segment, ask about what it found.

    Commands: ``/image PATH`` switches image, ``/save PATH`` saves the conversation, ``/quit`` ends.
    """
    from lens.agent import Conversation, LensAgent
    from lens.images import load_image

    agent = LensAgent(_pipeline(checkpoint, device))
    conversation = Conversation()
    conversation.add_image(load_image(image))
    overlays.mkdir(parents=True, exist_ok=True)
    out = Console()
    out.print(f"[bold]chatting about {image}[/bold] (/image PATH, /save PATH, /quit)")
    while True:
        try:
            text = out.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text.startswith("/image "):
            conversation.add_image(load_image(Path(text[7:].strip())))
            out.print(f"now talking about {text[7:].strip()}")
            continue
        if text.startswith("/save "):
            out.print(f"saved to {conversation.save(Path(text[6:].strip()))}")
            continue
        try:
            reply = agent(conversation, text)
        except ValueError as error:
            out.print(f"[red]{error}[/red]")
            continue
        out.print(f"[bold green]lens>[/bold green] {reply.text}  [dim]({reply.intent})[/dim]")
        if reply.overlay is not None:
            path = overlays / f"turn_{len(conversation.turns) // 2:03d}.png"
            reply.overlay.save(path)
            out.print(f"[dim]overlay: {path}[/dim]")
    if save is not None:
        conversation.save(save)
        logger.info("conversation saved to %s", save)


def serve(
    host: Annotated[str, typer.Option(help="interface to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: int = 8000,
    ui: Annotated[bool, typer.Option(help="also mount the Gradio web app at /ui")] = False,
    checkpoint: CheckpointOption = SYNTHETIC_LENS,
    device: DeviceOption = "auto",
    max_pending: Annotated[int, typer.Option(help="segment requests queued or running; beyond: 503")] = 64,
    max_batch: Annotated[int, typer.Option(help="(image, query) pairs per forward pass")] = 16,
    max_pixels: Annotated[int, typer.Option(help="largest image accepted, in pixels")] = 40_000_000,
) -> None:
    """Serve the JSON API (POST /v1/segment, POST /v1/chat, GET /healthz; docs at /docs) and --ui the web app."""
    import uvicorn

    from lens.serve import ServeSettings, create_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "binding %s: the service has no authentication; anyone who reaches it can use it", host
        )
    settings = ServeSettings(max_pending=max_pending, max_batch=max_batch, max_pixels=max_pixels)
    app = create_app(_pipeline(checkpoint, device), settings=settings)
    if ui:
        from lens.serve.web import mount_ui

        app = mount_ui(app)
    logger.info("serving on http://%s:%d%s", host, port, " (web app at /ui)" if ui else "")
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer, run) -> None:
    """Add the commands to the ``lens`` app; ``run`` turns user errors into one line and exit code 2."""
    for function in (segment, chat, serve):
        app.command(function.__name__)(_guarded(function, run))


def _guarded(function, run):
    @functools.wraps(function)
    def command(*args, **kwargs):
        return run(function, *args, **kwargs)

    return command
