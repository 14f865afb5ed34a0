"""A FastAPI (Pydantic 2) app that records what it executes, for tests/frameworks.rs.
Usage: fastapi_app.py PORT. GET /executed returns (and clears) what the other routes ran with.
"""
import sys
from typing import Optional

import uvicorn
from fastapi import FastAPI, Header, Query
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

app = FastAPI()
ran: list = []


class Transfer(BaseModel):
    # The API's name is `destination`; Python code names it `dest`, and populate_by_name lets a
    # body use either.
    model_config = ConfigDict(populate_by_name=True)
    amount: int
    dest: Optional[str] = Field(default=None, alias="destination")


class Payout(BaseModel):
    amount: int
    destination: Optional[str] = Field(
        default=None, validation_alias=AliasChoices("destination", "dest", "to_account")
    )


class Incident(BaseModel):
    class Body(BaseModel):
        type: str
        details: str

    type: str
    title: str
    body: Body


class IncidentRequest(BaseModel):
    incident: Incident


@app.post("/transfers")
def transfer(t: Transfer):
    ran.append({"transfer": {"amount": t.amount, "destination": t.dest}})
    return {"ok": True}


@app.post("/payouts")
def payout(p: Payout):
    ran.append({"payout": {"amount": p.amount, "destination": p.destination}})
    return {"ok": True}


@app.post("/incidents")
def create_incident(r: IncidentRequest, from_: str = Header(alias="From")):
    ran.append({"incident": r.model_dump(), "from": from_})
    return {"ok": True}


@app.get("/incidents")
def list_incidents(statuses: list[str] = Query(default=[], alias="statuses[]")):
    ran.append({"list_incidents": {"statuses": statuses}})
    return {"ok": True}


@app.post("/measurements")
def measure(m: dict):
    ran.append({"measure": {"raw": m}})
    return {"ok": True}


@app.get("/executed")
def executed():
    out = list(ran)
    ran.clear()
    return out


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
