"""The HTTP face: everything a caller reaches over HTTP, and the app that mounts it all.

Owns: the app and its lifespan (`app`), the task routes (`api`) and their fast lane
(`fastlane`), limits checked at the edge before any state changes (`edge`), the JSON views
of tasks and nodes (`views`) with their typed shapes (`api_types`), the admin, drain,
tenant and node routes (`admin_api`, `drain_api`, `tenant_api`, `node_api`), artifact
uploads and downloads (`artifacts`), the OpenAPI document (`openapi`, `openapi_routes`),
the console pages (`ui`, `static/`) and task-type templates (`templates`,
`templates.toml`), and the deadline for HTTP request heads (`slowloris`).

May import every other wing and `shared`; nothing imports it but `coordinator.__main__`.
"""
