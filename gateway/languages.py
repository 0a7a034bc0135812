"""The portal's language names -> ISO 639-1 codes, for speech models.

The portal sends ``payload_markers.language`` as a full language name, either in English
("German") or in the language itself ("Deutsch", "Русский"), depending on the portal's
version and interface language. Transcription models want a code ("de"); an unknown
name gives None, and the model detects the language itself.

The table covers the languages Bitrix24 portals are offered in, plus the most spoken
others Whisper knows. A name not listed here is not an error: it costs only detection.
"""

from __future__ import annotations

import re

_NAMES: dict[str, tuple[str, ...]] = {
    "ar": ("arabic", "العربية", "عربي"),
    "be": ("belarusian", "беларуская"),
    "bg": ("bulgarian", "български"),
    "cs": ("czech", "čeština", "cestina"),
    "da": ("danish", "dansk"),
    "de": ("german", "deutsch"),
    "el": ("greek", "ελληνικά"),
    "en": ("english",),
    "es": ("spanish", "español", "espanol", "castellano"),
    "fa": ("persian", "farsi", "فارسی"),
    "fi": ("finnish", "suomi"),
    "fr": ("french", "français", "francais"),
    "he": ("hebrew", "עברית"),
    "hi": ("hindi", "हिन्दी", "हिंदी"),
    "hu": ("hungarian", "magyar"),
    "hy": ("armenian", "հայերեն"),
    "id": ("indonesian", "bahasa indonesia"),
    "it": ("italian", "italiano"),
    "ja": ("japanese", "日本語"),
    "ka": ("georgian", "ქართული"),
    "kk": ("kazakh", "қазақша", "қазақ тілі", "казахский"),
    "ko": ("korean", "한국어"),
    "lt": ("lithuanian", "lietuvių"),
    "lv": ("latvian", "latviešu"),
    "ms": ("malay", "bahasa melayu"),
    "nl": ("dutch", "nederlands"),
    "no": ("norwegian", "norsk"),
    "pl": ("polish", "polski"),
    "pt": ("portuguese", "português", "portugues"),
    "ro": ("romanian", "română", "romana"),
    "ru": ("russian", "русский", "русский язык"),
    "sk": ("slovak", "slovenčina"),
    "sr": ("serbian", "српски", "srpski"),
    "sv": ("swedish", "svenska"),
    "th": ("thai", "ไทย", "ภาษาไทย"),
    "tr": ("turkish", "türkçe", "turkce"),
    "uk": ("ukrainian", "українська"),
    "uz": ("uzbek", "oʻzbekcha", "o'zbekcha", "ўзбекча"),
    "vi": ("vietnamese", "tiếng việt", "tieng viet"),
    "zh": ("chinese", "中文", "简体中文", "繁體中文", "汉语", "漢語", "普通话"),
}
_CODES = {name: code for code, names in _NAMES.items() for name in names}
_QUALIFIER = re.compile(r"\s*[(\[].*$")  # "Português (Brasil)", "Chinese (Simplified)"


def language_code(name: str | None) -> str | None:
    """ISO 639-1 code for a language name as the portal sends it; None when unknown."""
    if not name:
        return None
    key = _QUALIFIER.sub("", name.strip()).casefold()
    if key in _NAMES:  # the portal or a plugin already sent a code
        return key
    return _CODES.get(key)
