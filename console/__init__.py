"""The operators' web console: an aiohttp + jinja2 edge over URFA (no database access).

``console.app`` builds and serves it, ``console.page`` is the API page
modules are written against, ``console.pages`` lists the page modules.
"""
