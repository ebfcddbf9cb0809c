"""The Firestore codec: google-cloud-firestore's raw protobuf message classes
(no proto-plus wrapping on the hot path), a task's fields as Firestore
values and back, the names of the documents a collection holds, and the
StructuredQuery of a list page. No I/O: the store and the Listen hub both
build their requests with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from google.cloud.firestore_v1.types import common as _common
from google.cloud.firestore_v1.types import document as _document
from google.cloud.firestore_v1.types import firestore as _firestore
from google.cloud.firestore_v1.types import query as _query
from google.cloud.firestore_v1.types import write as _write
from google.protobuf import timestamp_pb2, wrappers_pb2

from taskservice.domain.model import PRIORITIES, STATES, ListQuery, Task, TaskContent, TaskFilter

if TYPE_CHECKING:
    # proto-plus builds these raw protobuf classes at runtime (Message.pb()) and
    # nothing ships stubs for them, so mypy cannot type them (_RawMessage). One alias
    # names each message so that signatures say which one they take or return.
    _RawMessage: TypeAlias = Any
    Document: TypeAlias = _RawMessage
    Value: TypeAlias = _RawMessage
    ArrayValue: TypeAlias = _RawMessage
    Write: TypeAlias = _RawMessage
    FieldTransform: TypeAlias = _RawMessage
    Precondition: TypeAlias = _RawMessage
    CommitRequest: TypeAlias = _RawMessage
    CommitResponse: TypeAlias = _RawMessage
    GetDocumentRequest: TypeAlias = _RawMessage
    BatchGetDocumentsRequest: TypeAlias = _RawMessage
    BatchGetDocumentsResponse: TypeAlias = _RawMessage
    RunQueryRequest: TypeAlias = _RawMessage
    RunQueryResponse: TypeAlias = _RawMessage
    ListenRequest: TypeAlias = _RawMessage
    ListenResponse: TypeAlias = _RawMessage
    TargetChange: TypeAlias = _RawMessage
    Target: TypeAlias = _RawMessage
    StructuredQuery: TypeAlias = _RawMessage
    QueryCursor: TypeAlias = _RawMessage
    QueryFilter: TypeAlias = _RawMessage
else:
    Document = _document.Document.pb()
    Value = _document.Value.pb()
    ArrayValue = _document.ArrayValue.pb()
    Write = _write.Write.pb()
    FieldTransform = _write.DocumentTransform.FieldTransform.pb()
    Precondition = _common.Precondition.pb()
    CommitRequest = _firestore.CommitRequest.pb()
    CommitResponse = _firestore.CommitResponse.pb()
    GetDocumentRequest = _firestore.GetDocumentRequest.pb()
    BatchGetDocumentsRequest = _firestore.BatchGetDocumentsRequest.pb()
    BatchGetDocumentsResponse = _firestore.BatchGetDocumentsResponse.pb()
    RunQueryRequest = _firestore.RunQueryRequest.pb()
    RunQueryResponse = _firestore.RunQueryResponse.pb()
    ListenRequest = _firestore.ListenRequest.pb()
    ListenResponse = _firestore.ListenResponse.pb()
    TargetChange = _firestore.TargetChange.pb()
    Target = _firestore.Target.pb()
    StructuredQuery = _query.StructuredQuery.pb()
    QueryCursor = _query.Cursor.pb()
    QueryFilter = _query.StructuredQuery.Filter.pb()
REQUEST_TIME = FieldTransform.REQUEST_TIME


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(ns)
    return timestamp


def encode_content(content: TaskContent) -> dict[str, Value]:
    """A task's content as the fields of its document."""
    return {
        "title": Value(string_value=content.title),
        "description": Value(string_value=content.description),
        "priority": Value(integer_value=int(content.priority)),
        "state": Value(integer_value=int(content.state)),
        "assignee": Value(string_value=content.assignee),
        "tags": Value(array_value=ArrayValue(values=[Value(string_value=t) for t in content.tags])),
    }


def decode_content(fields: Mapping[str, Value]) -> TaskContent:
    return TaskContent(
        title=fields["title"].string_value,
        description=fields["description"].string_value,
        priority=PRIORITIES[fields["priority"].integer_value],
        state=STATES[fields["state"].integer_value],
        assignee=fields["assignee"].string_value,
        tags=tuple(v.string_value for v in fields["tags"].array_value.values),
    )


def decode_task(doc: Document) -> Task:
    """The task a document holds; its version is the document's update_time."""
    fields = doc.fields
    return Task(
        task_id=doc.name.rpartition("/")[2],
        content=decode_content(fields),
        create_time_ns=fields["create_time"].timestamp_value.ToNanoseconds(),
        update_time_ns=fields["update_time"].timestamp_value.ToNanoseconds(),
        version=doc.update_time.ToNanoseconds(),
    )


class Collection:
    """The names within one database that a task collection uses: the tasks,
    their request-id markers, and the queries over the tasks."""

    def __init__(self, project: str, database: str = "(default)", collection: str = "tasks"):
        self.project = project
        self.database_id = database
        self.database = f"projects/{project}/databases/{database}"
        self.documents = f"{self.database}/documents"
        self.collection = collection
        self.task_prefix = f"{self.documents}/{collection}/"
        self.request_prefix = f"{self.documents}/{collection}-requests/"

    def task(self, task_id: str) -> str:
        return self.task_prefix + task_id

    def request(self, request_id: str) -> str:
        return self.request_prefix + request_id

    def query(self, query: ListQuery) -> StructuredQuery:
        """The StructuredQuery for one list page (limit + 1: one look-ahead)."""
        sq = StructuredQuery()
        sq.from_.add(collection_id=self.collection)
        filters = _filters(query.filter)
        if len(filters) == 1:
            sq.where.CopyFrom(filters[0])
        elif filters:
            sq.where.composite_filter.op = StructuredQuery.CompositeFilter.AND
            sq.where.composite_filter.filters.extend(filters)
        direction = (
            StructuredQuery.DESCENDING if query.ordering.descending else StructuredQuery.ASCENDING
        )
        sq.order_by.add(
            field=StructuredQuery.FieldReference(field_path=query.ordering.field.value),
            direction=direction,
        )
        sq.order_by.add(
            field=StructuredQuery.FieldReference(field_path="__name__"), direction=direction
        )
        if query.after is not None:
            sq.start_at.CopyFrom(
                QueryCursor(
                    values=[
                        Value(timestamp_value=timestamp_from_ns(query.after.time_ns)),
                        Value(reference_value=self.task(query.after.task_id)),
                    ],
                    before=False,
                )
            )
        sq.limit.CopyFrom(wrappers_pb2.Int32Value(value=query.limit + 1))
        return sq

    def view_query(self, task_filter: TaskFilter) -> StructuredQuery:
        """The StructuredQuery of every task matching task_filter (no limit)."""
        query = self.query(ListQuery(filter=task_filter))
        query.ClearField("limit")
        return query


def _filters(f: TaskFilter) -> list[QueryFilter]:
    FieldFilter = StructuredQuery.FieldFilter
    out: list[QueryFilter] = []

    def add(field: str, op: int, value: Value) -> None:
        filt = StructuredQuery.Filter()
        filt.field_filter.CopyFrom(
            FieldFilter(field=StructuredQuery.FieldReference(field_path=field), op=op, value=value)
        )
        out.append(filt)

    if f.state is not None:
        add("state", FieldFilter.EQUAL, Value(integer_value=int(f.state)))
    if f.priority is not None:
        add("priority", FieldFilter.EQUAL, Value(integer_value=int(f.priority)))
    if f.assignee is not None:
        add("assignee", FieldFilter.EQUAL, Value(string_value=f.assignee))
    if f.tag is not None:
        add("tags", FieldFilter.ARRAY_CONTAINS, Value(string_value=f.tag))
    return out
