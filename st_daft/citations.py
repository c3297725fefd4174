"""The BibTeX entries of the two papers st-daft implements, for losses' ``citation`` and the model card: DAFT
(Leonhardt, Jahnke & Anand 2022) and corrector networks (Monath et al. 2024)."""

DAFT_CITATION = """
@misc{leonhardt2022daft,
    title={Distribution-Aligned Fine-Tuning for Efficient Neural Retrieval},
    author={Jurek Leonhardt and Marcel Jahnke and Avishek Anand},
    year={2022},
    eprint={2211.04942},
    archivePrefix={arXiv},
    primaryClass={cs.IR},
    url={https://arxiv.org/abs/2211.04942},
}
"""

CORRECTOR_CITATION = """
@inproceedings{monath2024corrector,
    title={A Fresh Take on Stale Embeddings: Improving Dense Retriever Training with Corrector Networks},
    author={Nicholas Monath and Will Grathwohl and Michael Boratko and Rob Fergus and Andrew McCallum
        and Manzil Zaheer},
    booktitle={International Conference on Machine Learning},
    year={2024},
    url={https://arxiv.org/abs/2409.01890},
}
"""
