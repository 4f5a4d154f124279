"""Pure decisions over plain data: the planner, cold-path placement, vmodel cutover, model
status, configuration precedence and the repository's sync plan. No Redis, no Celery, no
clock of their own (time is an argument): what the unit tests and the simulator exercise."""
