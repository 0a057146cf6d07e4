"""An HTML page rendered with jinja2 (a dependency from requirements.txt)."""

import jinja2

ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader("templates"),  # relative: the runtime starts in /var/task
    autoescape=True,
)
TEMPLATE = ENV.get_template("page.html")


def handler(event, context):
    items = event.get("items", []) if isinstance(event, dict) else []
    title = event.get("title", "ember") if isinstance(event, dict) else "ember"
    return {"html": TEMPLATE.render(title=title, items=items)}
