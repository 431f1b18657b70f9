"""Invoices, credit notes and statements as HTML and PDF (an edge: it renders what URFA calls return).

``documents.render`` is the whole API: ``invoice_html``, ``invoice_pdf``,
``statement_html``, ``statement_pdf``; ``documents.view.Issuer`` carries
the ISP's details from the ``[documents]`` config section.
"""
