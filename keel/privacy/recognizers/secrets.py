"""SECRET: credentials pasted into text: API keys, tokens, private keys, passwords.

Known key shapes are matched by their vendor prefixes; anything else only behind an
assignment such as `password=...` or `api_key: ...`, so ordinary words are left alone.
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer


class SecretRecognizer(KeelPatternRecognizer):
    ENTITY = "SECRET"
    PATTERNS = [
        Pattern("AWS access key id", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b", 0.9),
        Pattern("GitHub token", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
                0.95),
        Pattern("Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,250}\b", 0.95),
        Pattern("OpenAI/Anthropic-style key", r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,200}\b", 0.9),
        Pattern("Stripe key", r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,99}\b", 0.95),
        Pattern("Google API key", r"\bAIza[0-9A-Za-z_-]{35}\b", 0.95),
        Pattern("Keel API key", r"\bkeel-[A-Za-z0-9_-]{40,}\b", 0.95),
        Pattern("JWT", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0.9),
        Pattern(
            "PEM private key",
            r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.*?(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----|\Z)",
            0.99,
        ),
        Pattern(
            "assigned secret",
            r"(?i)(?<=\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token|client[_-]?secret)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]{6,200}",
            0.8,
        ),
        Pattern("bearer token", r"(?i)(?<=\bbearer\s)[A-Za-z0-9._~+/-]{16,}=*", 0.8),
    ]
    CONTEXT = ["key", "token", "secret", "password", "credential"]
