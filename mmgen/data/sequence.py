"""The sequence layout lives in :mod:`mmgen.processing.sequence`; this name stays for the code that
imports it from here."""

from mmgen.processing.sequence import (ASSISTANT_ROLES, ASSISTANT_TAG, TARGET_KINDS, USER_ROLES,  # noqa: F401
                                       USER_TAG, SequenceStats, build_chat_sequence, build_sequence,
                                       build_sequences, chat_layout, doc_texts, encode_chat_prompt, encode_prompt,
                                       encode_text, has_roles, media_ids)
