"""What a trained or imported model becomes for use outside training: a diffusers pipeline, in memory or as a folder.

    export_folder.py    an export (config.json + safetensors): read, checked, its family and text mode
    loading.py          an export -> the family's diffusers pipeline, weights read once into a meta-built network
    bundle.py           one self-contained source file per component, so exported folders load without microdit
    diffusers_folder.py an export -> the standard diffusers folder (model_index.json, components, code, model card)
    model_card.py       the folder's README.md with the Hub's metadata
"""
