"""The model store: directory layouts and validators, preparation, random-weight builders."""
