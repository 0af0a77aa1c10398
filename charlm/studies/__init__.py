"""The studies: measurements that train and probe models through the builder, and the report that gathers
them (gradient flow, clipping, the recall task and its memory-span probe). They sit above the core and the
models, which never import them; `python -m charlm.report` and `python -m charlm.gradflow` run them."""
