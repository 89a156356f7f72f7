"""The migrations and the models describe the same schema, with the seed's indexes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from shared.db import Database
from shared.models import Base


def test_migrations_match_models(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_seed_indexes_and_natural_keys_exist(db: Database) -> None:
    insp = inspect(db.engine)
    with db.engine.connect() as conn:
        indexdef = conn.scalar(
            text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_features_status_created_at'"
            )
        )
    assert indexdef is not None
    assert indexdef.endswith("USING btree (status, created_at DESC)")
    test_cases = {ix["name"]: ix["column_names"] for ix in insp.get_indexes("test_cases")}
    assert test_cases["ix_test_cases_feature_id"] == ["feature_id"]
    for table in ("features", "test_cases"):
        uniques = [u["column_names"] for u in insp.get_unique_constraints(table)]
        assert ["external_id"] in uniques
    assert set(insp.get_table_names()) >= {
        "features",
        "test_cases",
        "environments",
        "deployments",
        "deployment_events",
        "jobs",
        "import_errors",
        "api_tokens",
    }
