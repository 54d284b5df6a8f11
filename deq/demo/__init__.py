"""The web demo's logic, without the web framework: everything ``app.py`` lays out and wires.

One road from an upload to the page::

    uploads.image_source -> images.prepare_image -> inference.solve (per solver of inference.RACE,
    via DEQClassifier.predict) -> stream.stream_solve -> figures + text -> Frame

Rooms (each imports only the library and the rooms before it):

- ``images``: untrusted image files -> (1, 3, 32, 32) tensors, with messages fit for users.
- ``limits``: request-size limits (an ASGI middleware) and the largest pasted image.
- ``uploads``: which file a request's image payload may be read from.
- ``inference``: a request's solver settings, the race's solver list, one solver's solve.
- ``figures``: every Plotly figure (the live residual chart, the training charts).
- ``text``: the results table, status, warnings and notes, as Markdown.
- ``stream``: the race in a worker thread, streamed as frames.
- ``catalogue``: the models served (reads DEQ_MODEL, DEQ_CHECKPOINTS, DEQ_DEVICE).

Only this subpackage imports plotly; nothing here imports gradio, so all of it is unit-tested
without a server or a browser. Import the rooms themselves (``deq.demo.inference``, ...): this
package's ``__init__`` loads none of them.
"""
