"""Plain nn.Modules behind one interface: `logits, state = model(idx, state=None)`.

idx: (B, T) long -> logits: (B, T, V). `state` is whatever the model needs to continue the
sequence (h, (h, c), a KV cache); feeding a sequence in chunks with the returned state gives the
same logits as feeding it whole. The loss lives in `charlm.training.module.CharLM`, not here.
"""
