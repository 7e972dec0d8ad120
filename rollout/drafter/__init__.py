"""An EAGLE-style speculative drafter trained online against the changing policy (the target model).

- ``model``: the drafter (one Llama-style decoder layer over ``[token embedding; target hidden state]``, sharing
  the target's embedding and LM head, frozen);
- ``checkpoint``: the checkpoint format vLLM's ``eagle`` method loads, and the bytes for an in-place reload;
- ``train``: the EAGLE objective (feature regression + token cross-entropy) and a time-budgeted trainer;
- ``buffer``: the most recent steps' (token ids, target hidden states), sampled into training batches;
- ``bandit``: the number of speculative tokens per batch-size bucket, chosen from measured throughput;
- ``metrics``: vLLM's speculative-decoding counters (acceptance length);
- ``capture``: the target's hidden states from a transformers model (the state vLLM hands the drafter);
- ``evaluate``: an offline replay of greedy speculative decoding (the acceptance the engine would measure).

``docs/drafter.md`` describes the format, the objective and what has been measured.
"""
