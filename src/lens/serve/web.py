"""The web app (``lens serve --ui``, at ``/ui``): upload an image and chat with the agent (``pip install gradio``).

Segmentation turns show the overlay and A_c with the keypoints (white inside the mask, red outside); follow-ups
are answered about the last mask; synthetic test scenes are one click away. The intent can be left to the
router or fixed by the user (the shipped synthetic MLLM routes poorly: docs/agent.md).
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from PIL import Image

from lens.agent import Conversation, LensAgent
from lens.errors import InvalidInput
from lens.images import load_image

INTENT_CHOICES = ("auto", "segmentation", "dialogue", "follow_up")
EXAMPLE_SCENES = (0, 1, 2, 5)  # synthetic test scenes shown as one-click examples


def example_images(directory: Path) -> list[str]:
    """A few synthetic test scenes written as PNGs (Gradio examples are files)."""
    from lens.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=0)
    paths = []
    for index in EXAMPLE_SCENES:
        path = directory / f"synthetic_test_{index}.png"
        Image.fromarray(world.scene("test", index).image).save(path)
        paths.append(str(path))
    return paths


def build_ui(agent: LensAgent, executor: Executor | None = None, max_pixels: int | None = 40_000_000) -> Any:
    """The Gradio Blocks app; model calls go through ``executor`` (the service's single model thread)."""
    import gradio as gr

    examples_dir = Path(tempfile.mkdtemp(prefix="lens-ui-"))

    def respond(message: str, image: Image.Image | None, intent: str, history: list, state: dict | None):
        state = state or {"conversation": Conversation(), "image_key": None}
        conversation: Conversation = state["conversation"]
        if image is None:
            raise gr.Error("Upload an image first (PNG, JPEG, ...), or click one of the examples.")
        if not (message or "").strip():
            raise gr.Error("Type a message.")
        try:
            picture = load_image(image, max_pixels=max_pixels)
        except InvalidInput as error:
            raise gr.Error(f"That upload cannot be used: {error}") from None
        key = (picture.size, hash(picture.tobytes()))
        new_image = picture if key != state["image_key"] else None
        state["image_key"] = key

        def turn():
            return agent(conversation, message, image=new_image, intent=None if intent == "auto" else intent)

        try:
            reply = executor.submit(turn).result() if executor is not None else turn()
        except InvalidInput as error:
            raise gr.Error(str(error)) from None
        label = reply.intent if reply.intent == reply.routed else f"{reply.intent}, routed {reply.routed}"
        history = [
            *history,
            {"role": "user", "content": message},
            {"role": "assistant", "content": f"{reply.text} [{label}]"},
        ]
        overlay = attention = gr.update()  # other turns leave the last segmentation on show
        if reply.segmentation is not None:
            overlay, attention = reply.overlay, reply.segmentation.attention_overlay()
        return history, overlay, attention, state, ""

    with gr.Blocks(title="LENS") as demo:
        gr.Markdown(
            "# LENS\nUpload an image and chat: ask a question, ask to **segment** something, then ask about "
            "what was segmented."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="pil", label="image", sources=["upload", "clipboard"], elem_id="lens-image"
                )
                gr.Examples(example_images(examples_dir), inputs=image, label="synthetic examples")
                intent = gr.Radio(
                    list(INTENT_CHOICES), value="auto", label="intent (auto: the MLLM's router)"
                )
            with gr.Column():
                chatbot = gr.Chatbot(label="conversation", elem_id="lens-chat")
                message = gr.Textbox(
                    label="message", placeholder="please segment the red ring.", elem_id="lens-msg"
                )
                send = gr.Button("send", elem_id="lens-send")
        with gr.Row():
            overlay = gr.Image(label="segmentation", interactive=False, elem_id="lens-overlay")
            attention = gr.Image(label="A_c and keypoints", interactive=False, elem_id="lens-attention")
        clear = gr.Button("new conversation")
        outputs = [chatbot, overlay, attention, state, message]
        send.click(respond, [message, image, intent, chatbot, state], outputs)
        message.submit(respond, [message, image, intent, chatbot, state], outputs)
        clear.click(lambda: ([], None, None, None, ""), None, outputs)
    return demo


def mount_ui(app: Any, path: str = "/ui") -> Any:
    """Mount the web app on the service's FastAPI ``app`` (same agent, same model thread)."""
    import gradio as gr

    demo = build_ui(app.state.agent, app.state.executor, app.state.settings.max_pixels)
    return gr.mount_gradio_app(app, demo, path=path)
