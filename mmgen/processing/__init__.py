"""Processing: the id space (:mod:`.vocab`), the sequence layout training and inference share
(:mod:`.sequence`) and :class:`~mmgen.processing.processor.MMGenProcessor`, which turns prompts, pictures
and chats into ids and generated ids back into a Doc with the bundle's saved chat template."""
