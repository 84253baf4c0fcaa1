"""Evaluation data and scores, MindSpore-free: what is fed to a network and how its
output is scored (WikiText-2 chunks, SQuAD prompts and metrics, the gensim corpora).

The runtime (`ckpt_rtn.runtime`, the [mindspore] extra) runs the network;
these modules only prepare its inputs and judge its outputs, so they are
tested, and reusable, without MindSpore.
"""
