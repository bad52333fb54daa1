"""Prompts: the chat frame around a turn, the placeholder expansion, and the texts each
training stage and the teacher read (DESIGN.md sections 4-5).

A user turn's content is a template such as `<speech>(with a <emotion> emotional tone).`;
`expand_placeholders` turns it into token ids with `<speech>` replaced by S copies of the
speech placeholder id and `<emotion>` by Q copies of the emotion placeholder id, so prompt
shapes are static and the model splices embeddings by id. Text between placeholders is
tokenized piece by piece, exactly as a tokenizer that knows the placeholders as special tokens
would. `ChatFormat` puts the system message and turn markers around that content;
`PromptBuilder` does both for training batches, `inference.chat` for multi-turn chat.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

SPEECH = "<speech>"
EMOTION = "<emotion>"
PLACEHOLDERS = (SPEECH, EMOTION)

# ChatML, the layout of Qwen's template, for tokenizers that carry no chat template.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Text around turns: the first user turn is `prefix + content + suffix`, then the reply;
    a reply is followed by `turn_end`, and later user turns start with `user_prefix`.

    "plain": `<bos>user: {content}\\nassistant: ` (short prompts for byte-level tiny models;
    no system message). "qwen" / "chatml": the ChatML frame of Qwen2.5 (and SmolLM2) with the
    system message of the model config (DESIGN.md section 4).
    """

    prefix: str
    suffix: str
    use_bos: bool
    user_prefix: str = "user: "
    turn_end: str = "\n"

    @staticmethod
    def named(name: str, system_prompt: str) -> "ChatFormat":
        if name == "plain":
            return ChatFormat("user: ", "\nassistant: ", True, "user: ", "\n")
        if name in ("qwen", "chatml"):  # Qwen2.5 and SmolLM2 share the ChatML frame
            return ChatFormat(f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
                              "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", False,
                              "<|im_start|>user\n", "<|im_end|>\n")
        raise ValueError(f"data.chat_template={name!r} is unknown; choose 'plain', 'qwen' or "
                         "'chatml'")


def expand_placeholders(template: str, encode: Callable[[str], List[int]], *,
                        speech_id: int, num_speech: int, emotion_id: int,
                        num_emotion: int) -> List[int]:
    """Token ids of `template` with `<speech>` -> `num_speech` x `speech_id` and `<emotion>`
    -> `num_emotion` x `emotion_id`; the text between them goes through `encode`."""
    ids: List[int] = []
    rest = template
    while rest:
        cut = [(rest.find(t), t) for t in PLACEHOLDERS if rest.find(t) >= 0]
        if not cut:
            ids += encode(rest)
            break
        pos, tag = min(cut)
        ids += encode(rest[:pos])
        ids += [speech_id] * num_speech if tag == SPEECH else [emotion_id] * num_emotion
        rest = rest[pos + len(tag):]
    return ids


class PromptBuilder:
    """Token ids of prompts with expanded placeholders.

    `speech_prompt(template)`: the user content is `template` with `<speech>` replaced by
    `num_speech` speech placeholder ids and `<emotion>` by `num_emotion` emotion placeholder
    ids (the model splices its embeddings there). `text_prompt(content)`: the same frame
    around plain text (teacher passes).
    """

    def __init__(self, tokenizer, fmt: ChatFormat, num_speech: int, num_emotion: int):
        self.tok, self.fmt = tokenizer, fmt
        self.num_speech, self.num_emotion = num_speech, num_emotion

    def _frame(self, content_ids: List[int]) -> List[int]:
        head = [self.tok.bos_id] if self.fmt.use_bos and self.tok.bos_id is not None else []
        return head + self.tok.encode(self.fmt.prefix) + content_ids + self.tok.encode(
            self.fmt.suffix)

    def speech_prompt(self, template: str) -> List[int]:
        ids = expand_placeholders(template, self.tok.encode,
                                  speech_id=self.tok.speech_token_id, num_speech=self.num_speech,
                                  emotion_id=self.tok.emotion_token_id,
                                  num_emotion=self.num_emotion)
        if ids.count(self.tok.speech_token_id) != self.num_speech:
            raise ValueError(f"prompt template {template!r} must hold {SPEECH} exactly once")
        return self._frame(ids)

    def text_prompt(self, content: str) -> List[int]:
        return self._frame(self.tok.encode(content))


@dataclasses.dataclass(frozen=True)
class PromptRecipe:
    """The user-turn text of every stage, in one place (DESIGN.md sections 4-5); training
    (`data.*_template` config values), chat, `distill` and evaluation all read it here.

    stage1: stage 1's user turn (speech only: the emotion part comes with stage 2).
    emotion_question: stage 2a's own user turn, asking *about* the emotion; 2a rows mixed into
        2b keep it, so the chat prompt never sees the target "The speaker sounds ...".
    teacher / teacher_emotion: what the frozen teacher LLM reads instead of speech, without
        and with the emotion label (`{transcript}`, `{emotion}` are filled in).
    neutral_plain: a neutral input gets the plain teacher text, so its target is a plain
        answer (DESIGN.md section 10: the release answers neutral questions plainly).
    The chat turn itself is the model config's `user_template` (what a checkpoint was
    trained with).
    """

    stage1: str = SPEECH
    emotion_question: str = f"{SPEECH}{EMOTION} What emotion does the speaker's voice convey?"
    teacher: str = "{transcript}"
    teacher_emotion: str = "{transcript} (with a {emotion} emotional tone)."
    neutral_plain: bool = False

    def teacher_text(self, transcript: str, emotion: Optional[str] = None) -> str:
        """The teacher's user turn for `transcript` (with `emotion` when given)."""
        if emotion is None or (self.neutral_plain and emotion == "neutral"):
            return self.teacher.format(transcript=transcript)
        return self.teacher_emotion.format(transcript=transcript, emotion=emotion)

    @staticmethod
    def from_config(data) -> "PromptRecipe":
        """From a training config's `data` section (ConfigDict or dict); unset keys keep the
        defaults."""
        get = data.get if hasattr(data, "get") else (lambda k, d=None: getattr(data, k, d))
        base = PromptRecipe()
        return PromptRecipe(
            stage1=get("stage1_template", None) or base.stage1,
            emotion_question=get("emotion_template", None) or base.emotion_question,
            teacher=get("teacher_template", None) or base.teacher,
            teacher_emotion=get("teacher_emotion_template", None) or base.teacher_emotion,
            neutral_plain=bool(get("teacher_neutral_plain", base.neutral_plain)))


def emotion_statement(emotion: str) -> str:
    """Stage 2a target: the LLM names the emotion it hears."""
    return f"The speaker sounds {emotion}."


def teacher_content(transcript: str, emotion: Optional[str] = None) -> str:
    """What the teacher LLM reads instead of speech with the default recipe: the transcript
    (plus the emotion label in 2b, where the frozen LLM writes the empathetic reply from text
    + label)."""
    return PromptRecipe().teacher_text(transcript, emotion)


def chat_text(tokenizer, config, user_text: Optional[str] = None) -> str:
    """The prompt text: system prompt + user turn (the config's user template by default),
    formatted with the tokenizer's chat template (ChatML when it has none)."""
    messages = [{"role": "system", "content": config.system_prompt},
                {"role": "user", "content": config.user_template if user_text is None
                 else user_text}]
    template = None if getattr(tokenizer, "chat_template", None) else CHATML
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template)


__all__: Sequence[str] = (
    "SPEECH", "EMOTION", "PLACEHOLDERS", "CHATML", "ChatFormat", "expand_placeholders",
    "PromptBuilder", "PromptRecipe", "emotion_statement", "teacher_content", "chat_text")


# ---------------------------------------------------------------------------------------------
# Dual thinking (OSUM-EChat recipe): the assistant turn first states a short paralinguistic
# analysis, then replies. With the LLM frozen the analysis is written from the heads'
# predictions (chat) or the labels (training targets) and put at the start of the assistant
# turn; the reply is what follows it, so the frozen teacher writes its reply conditioned on it.

# How each emotion label is said in the analysis ("neutral" reads oddly as a tone of voice).
ANALYSIS_EMOTION_WORDS = {"angry": "angry", "surprised": "surprised", "happy": "happy",
                          "sad": "sad", "neutral": "calm"}
ANALYSIS_GENDER_WORDS = {"female": "woman", "male": "man"}


def paralinguistic_analysis(emotion: Optional[str] = None, gender: Optional[str] = None,
                            age_group: Optional[str] = None) -> str:
    """The analysis that opens a dual-thinking assistant turn, e.g. `(The user sounds like a
    young woman, and sad.)`; any cue may be None (left out). Raises ValueError for a label
    it cannot word, and for no cue at all."""
    for value, allowed, what in ((emotion, ANALYSIS_EMOTION_WORDS, "emotion"),
                                 (gender, ANALYSIS_GENDER_WORDS, "gender"),
                                 (age_group, ("young", "middle-aged", "older"), "age group")):
        if value is not None and value not in allowed:
            raise ValueError(f"paralinguistic_analysis: unknown {what} {value!r}; expected one "
                             f"of {sorted(allowed)}")
    if emotion is None and gender is None and age_group is None:
        raise ValueError("paralinguistic_analysis needs at least one cue (emotion, gender or "
                         "age group)")
    feeling = ANALYSIS_EMOTION_WORDS[emotion] if emotion else None
    if gender is None and age_group is None:
        return f"(The user sounds {feeling}.)"
    person = ANALYSIS_GENDER_WORDS[gender] if gender else "person"
    who = f"{age_group} {person}" if age_group else person
    article = "an" if who[0] in "aeiou" else "a"
    tail = f", and {feeling}" if feeling else ""
    return f"(The user sounds like {article} {who}{tail}.)"


def dual_thinking_prefix(analysis: str) -> str:
    """The assistant-turn text that precedes the reply under dual thinking: the analysis on
    its own line (a trailing space would end the prefix mid-token for BPE tokenizers; the
    reply continues the same turn on the next line)."""
    return analysis + "\n"


__all__ = tuple(__all__) + ("ANALYSIS_EMOTION_WORDS", "ANALYSIS_GENDER_WORDS",
                            "paralinguistic_analysis", "dual_thinking_prefix")
