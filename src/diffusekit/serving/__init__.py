"""``diffusekit serve``: an HTTP API with a durable job queue, live progress and a web page.

Needs the optional extra ``serve`` (FastAPI, uvicorn): ``pip install 'diffusekit[serve]'``.
"""
