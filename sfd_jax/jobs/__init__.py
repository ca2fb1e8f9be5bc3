"""The jobs, one thin module per ``main.py --mode``: each reads its config section and
calls the parts (``training``, ``diffusion``, ``data``, ``checkpoint``, ``convert``,
``metrics``). Jobs never import each other; no part imports a job."""
