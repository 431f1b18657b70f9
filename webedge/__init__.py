"""What billcore's web edges share (the subscribers' office ``portal`` and the operators' ``console``).

An edge library, no process of its own: CSRF tokens and the login limiter
(``guard``), security headers, cookies' values, safe redirects, TLS and the
aiohttp runner (``http``), the number filters of the pages (``render``),
how a page picks its language (``i18n``), where an edge finds the core
(``settings``) and the link that calls as a proxied session (``core_link``).
Like every edge it imports nothing of billcore but ``billcore.common``.
"""
