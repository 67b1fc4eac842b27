"""The embedded default model (`model="tiny"`): its config and weights file (`model`), its codec (`melcodec`) and the
pipeline that trains it from rendered audio (`pretrain`, `ppt-fast pretrain`). Built on the audiocraft host."""
