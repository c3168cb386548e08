#!/usr/bin/env python3
"""Generates the example skills' datasets, deterministically from a seed.

Three skills unlike each other, each with one right answer per prompt (so exact match means something):
- python:  an English description -> a one-line Python function;
- sql:     a question over a fixed two-table schema -> one SQL query;
- extract: a free-text sentence -> a JSON object with the fields it names (structured extraction).

Each line is {"prompt", "completion"}. The prompt is already in SmolLM2's chat format (user turn, then the
assistant header), so training and evaluation feed the model exactly the text a chat client would.
Train and eval are disjoint by prompt. Usage: make_datasets.py [--seed N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
TRAIN_SIZE = 1200
EVAL_SIZE = 64


def chat_prompt(instruction: str) -> str:
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


# -- python: description -> one-line function ------------------------------------------------------

LISTS = ["xs", "nums", "values", "items", "data", "numbers"]
STRINGS = ["s", "text", "word", "line", "name"]
NUMBERS = ["n", "x", "value", "num"]
ASKS = ["Write a Python function", "Write a one-line Python function", "Define a Python function",
        "Create a Python function"]


def _python(rng: random.Random) -> tuple[str, str]:
    xs, s, x = rng.choice(LISTS), rng.choice(STRINGS), rng.choice(NUMBERS)
    k = rng.randint(2, 9)
    c = rng.choice("aeiourstxz")
    p = rng.choice(["ab", "pre", "un", "re", "x", "data_"])
    lo, hi = sorted(rng.sample(range(-20, 101), 2))
    tasks = [
        (["sum_squares", "square_sum"], f"returns the sum of the squares of the numbers in {xs}",
         f"({xs}): return sum(v * v for v in {xs})"),
        (["count_above", "count_greater"], f"counts how many numbers in {xs} are greater than {k}",
         f"({xs}): return sum(1 for v in {xs} if v > {k})"),
        (["reverse", "reversed_text"], f"returns the string {s} reversed", f"({s}): return {s}[::-1]"),
        (["evens", "only_even"], f"returns a list of the even numbers in {xs}",
         f"({xs}): return [v for v in {xs} if v % 2 == 0]"),
        (["scale", "times_k"], f"returns a list with every number in {xs} multiplied by {k}",
         f"({xs}): return [v * {k} for v in {xs}]"),
        (["is_palindrome", "palindrome"], f"returns True if the string {s} reads the same backwards",
         f"({s}): return {s} == {s}[::-1]"),
        (["count_vowels", "vowels"], f"counts the vowels in the string {s}",
         f"({s}): return sum(1 for ch in {s}.lower() if ch in 'aeiou')"),
        (["word_count", "count_words"], f"returns the number of words in the sentence {s}",
         f"({s}): return len({s}.split())"),
        (["head", "first_items"], f"returns the first {k} elements of {xs}", f"({xs}): return {xs}[:{k}]"),
        (["mean", "average"], f"returns the average of the numbers in {xs}",
         f"({xs}): return sum({xs}) / len({xs})"),
        (["to_fahrenheit", "c_to_f"], f"converts the Celsius temperature {x} to Fahrenheit",
         f"({x}): return {x} * 9 / 5 + 32"),
        (["clamp", "bounded"], f"clamps {x} to the range {lo} to {hi}",
         f"({x}): return max({lo}, min({hi}, {x}))"),
        (["has_prefix", "starts_with"], f"returns True if {s} starts with '{p}'",
         f"({s}): return {s}.startswith('{p}')"),
        (["distinct_sorted", "unique_sorted"], f"returns the sorted list of distinct values in {xs}",
         f"({xs}): return sorted(set({xs}))"),
        (["power", "raise_to"], f"returns {x} raised to the power {k}", f"({x}): return {x} ** {k}"),
        (["strip_char", "remove_char"], f"removes every '{c}' from the string {s}",
         f"({s}): return {s}.replace('{c}', '')"),
        (["divisible", "is_multiple"], f"returns True if {x} is divisible by {k}",
         f"({x}): return {x} % {k} == 0"),
        (["last", "last_item"], f"returns the last element of {xs}", f"({xs}): return {xs}[-1]"),
        (["shout", "upper"], f"returns the string {s} in upper case", f"({s}): return {s}.upper()"),
        (["total_length", "sum_lengths"], f"returns the total length of the strings in {xs}",
         f"({xs}): return sum(len(v) for v in {xs})"),
    ]
    names, what, body = rng.choice(tasks)
    name = rng.choice(names)
    return f"{rng.choice(ASKS)} {name} that {what}.", f"def {name}{body}"


# -- sql: question over a fixed schema -> query -----------------------------------------------------

SCHEMA = ("Schema: employees(id, name, dept, salary, city, hired_year); "
          "projects(id, title, dept, budget).")
DEPTS = ["Sales", "Engineering", "Marketing", "Finance", "Support", "Legal"]
CITIES = ["Berlin", "Paris", "Madrid", "Oslo", "Lisbon", "Vienna", "Dublin"]


def _sql(rng: random.Random) -> tuple[str, str]:
    d, c = rng.choice(DEPTS), rng.choice(CITIES)
    n = rng.randrange(1000, 20001, 50)
    k = rng.randint(2, 10)
    year = rng.randint(1995, 2024)
    letter = rng.choice("ABCDEJKLMPRST")
    tasks = [
        (f"List the names of employees in the {d} department.",
         f"SELECT name FROM employees WHERE dept = '{d}';"),
        (f"How many employees work in {c}?", f"SELECT COUNT(*) FROM employees WHERE city = '{c}';"),
        (f"What is the average salary in the {d} department?",
         f"SELECT AVG(salary) FROM employees WHERE dept = '{d}';"),
        (f"Which employees earn more than {n}?", f"SELECT name FROM employees WHERE salary > {n};"),
        (f"Show the {k} highest paid employees with their salaries.",
         f"SELECT name, salary FROM employees ORDER BY salary DESC LIMIT {k};"),
        (f"List the employees hired after {year}.", f"SELECT name FROM employees WHERE hired_year > {year};"),
        ("Count the employees in each department.", "SELECT dept, COUNT(*) FROM employees GROUP BY dept;"),
        (f"What is the total budget of the {d} projects?",
         f"SELECT SUM(budget) FROM projects WHERE dept = '{d}';"),
        (f"List the titles of projects with a budget below {n}.",
         f"SELECT title FROM projects WHERE budget < {n};"),
        (f"Which departments have more than {k} employees?",
         f"SELECT dept FROM employees GROUP BY dept HAVING COUNT(*) > {k};"),
        (f"What is the highest salary in {c}?", f"SELECT MAX(salary) FROM employees WHERE city = '{c}';"),
        (f"List the names of employees in {d} who live in {c}.",
         f"SELECT name FROM employees WHERE dept = '{d}' AND city = '{c}';"),
        (f"Which employees have a name starting with {letter}?",
         f"SELECT name FROM employees WHERE name LIKE '{letter}%';"),
        ("What is the average project budget per department?",
         "SELECT dept, AVG(budget) FROM projects GROUP BY dept;"),
        (f"List each employee with the titles of projects of their department that cost more than {n}.",
         f"SELECT e.name, p.title FROM employees e JOIN projects p ON e.dept = p.dept WHERE p.budget > {n};"),
        (f"How many projects does the {d} department have?",
         f"SELECT COUNT(*) FROM projects WHERE dept = '{d}';"),
    ]
    question, query = rng.choice(tasks)
    return f"{SCHEMA}\n{question}", query


# -- extract: sentence -> JSON ----------------------------------------------------------------------

FIRST = ["Maria", "Jonas", "Aiko", "Pedro", "Fatima", "Liam", "Chen", "Olga", "Kwame", "Sofia", "Noah",
         "Priya", "Lars", "Amara", "Diego", "Hana"]
LAST = ["Lopez", "Berg", "Tanaka", "Silva", "Haddad", "Walsh", "Wang", "Ivanova", "Mensah", "Rossi",
        "Keller", "Patel", "Nilsson", "Okafor", "Ruiz", "Kim"]
ITEMS = ["blue mug", "desk lamp", "notebook", "usb cable", "water bottle", "chair", "backpack",
         "pencil case", "phone stand", "tea kettle"]


def _extract(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        age, city = rng.randint(18, 80), rng.choice(CITIES)
        text = rng.choice([
            f"{name} is {age} years old and lives in {city}.",
            f"Living in {city}, {name} turned {age} this year.",
            f"{name} ({age}) moved to {city} last spring.",
            f"Our new member from {city} is {name}, aged {age}.",
        ])
        fields, value = "name, age and city", {"name": name, "age": age, "city": city}
    else:
        item, qty = rng.choice(ITEMS), rng.randint(1, 20)
        price = rng.randint(100, 9999) / 100
        text = rng.choice([
            f"Please send {qty} of the {item} at {price:.2f} dollars each.",
            f"Order: {item}, quantity {qty}, unit price ${price:.2f}.",
            f"I would like {qty} x {item} (${price:.2f} per piece).",
            f"Add the {item} to my cart, {qty} units, {price:.2f} USD each.",
        ])
        fields, value = "item, quantity and price", {"item": item, "quantity": qty, "price": price}
    return f"Extract {fields} as JSON: {text}", json.dumps(value)


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "python": _python,
    "sql": _sql,
    "extract": _extract,
}


def generate(skill: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) for one skill; eval prompts never occur in train."""
    rng = random.Random(f"{seed}/{skill}")  # one stream per skill: adding a skill changes no other
    make = SKILLS[skill]
    seen: set[str] = set()
    eval_rows: list[dict] = []
    while len(eval_rows) < EVAL_SIZE:
        instruction, completion = make(rng)
        if instruction not in seen:
            seen.add(instruction)
            eval_rows.append({"prompt": chat_prompt(instruction), "completion": completion})
    train_rows: list[dict] = []
    while len(train_rows) < TRAIN_SIZE:
        instruction, completion = make(rng)
        if instruction not in seen:  # repeats within train are fine, overlap with eval is not
            train_rows.append({"prompt": chat_prompt(instruction), "completion": completion})
    return train_rows, eval_rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE, help="writes OUT/train/*.jsonl and OUT/eval/*.jsonl")
    args = parser.parse_args()
    for skill in SKILLS:
        train, held_out = generate(skill, args.seed)
        write_jsonl(args.out / "train" / f"{skill}.jsonl", train)
        write_jsonl(args.out / "eval" / f"{skill}.jsonl", held_out)
        print(f"{skill}: {len(train)} train, {len(held_out)} eval")


if __name__ == "__main__":
    main()
