"""Create or update the forecaster's MLflow users; run as MLflow's admin, once MLflow is up.

The MLflow server runs its basic-auth app (`mlflow server --app-name basic-auth`, with
basic_auth.ini beside this file), where a user may do nothing it is not granted. This step makes
the two users the forecaster logs in as, and grants each what it needs on every experiment and
registered model (the wildcard ``*``, so that the trainer's future experiments are covered):

- the trainer (``MLFLOW_TRAINER_USERNAME``/``MLFLOW_TRAINER_PASSWORD``): MANAGE, as it creates
  runs, registers versions, moves aliases and deletes orphan versions;
- the service (``MLFLOW_SERVICE_USERNAME``/``MLFLOW_SERVICE_PASSWORD``): READ, to find the
  champion and download it. It cannot write to anything the trainer made.

It logs in as the admin through MLflow's own client settings: ``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``. Idempotent: run again, it sets
each existing user's password to the configured one (how the passwords are rotated) and each
grant to the level above. docker-compose.yml runs it as the one-shot service ``mlflow-users``,
deploy/k8s as the Job ``mlflow-users``::

    python /app/mlflow-auth/create_users.py
"""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import RestException
from mlflow.server import get_app_client
from mlflow.server.auth.client import AuthServiceClient

# the registry objects the forecaster uses: runs, logged models and model versions are governed
# by the grant on their experiment or registered model
RESOURCE_TYPES = ("experiment", "registered_model")
# user (as the environment variable prefix) -> permission on every resource of RESOURCE_TYPES
USERS = {"MLFLOW_TRAINER": "MANAGE", "MLFLOW_SERVICE": "READ"}


def _setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"create_users.py: {name} is not set")
    return value


def ensure_user(client: AuthServiceClient, username: str, password: str) -> None:
    """Create ``username``, or give the existing user ``password``."""
    try:
        client.create_user(username, password)
    except RestException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(username, password)
        print(f"user {username}: exists, password set")
    else:
        print(f"user {username}: created")


def ensure_grant(client: AuthServiceClient, username: str, resource_type: str,
                 permission: str) -> None:
    """Grant ``permission`` on every resource of ``resource_type``, replacing another level."""
    try:
        client.grant_user_permission(username, resource_type, "*", permission)
    except RestException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.revoke_user_permission(username, resource_type, "*")
        client.grant_user_permission(username, resource_type, "*", permission)
    print(f"user {username}: {permission} on every {resource_type}")


def main() -> int:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        _setting(name)
    client = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    for prefix, permission in USERS.items():
        username = _setting(f"{prefix}_USERNAME")
        ensure_user(client, username, _setting(f"{prefix}_PASSWORD"))
        for resource_type in RESOURCE_TYPES:
            ensure_grant(client, username, resource_type, permission)
    return 0


if __name__ == "__main__":
    sys.exit(main())
