"""The web console: a few static files (HTML, CSS, JavaScript modules) the controller serves
on its API listener at ``/ui/``, and ``GET /api/v1/me`` (who the signed-in operator is and what
the route policy lets them do). Everything the page shows or changes it asks of the operator
API with the operator's own bearer token, so the API's tenant scoping and role checks apply to
the console exactly as they do to ``margoctl``. See ``routes.py`` for sign-in and CSRF."""
