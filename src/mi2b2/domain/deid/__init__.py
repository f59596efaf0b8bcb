"""De-identification rules, pure: the profile and its options, the action for each attribute, pseudonyms, burned-in.

    profile.py     export modes, PS3.15 Annex E options and their CID 7050 codes
    table.py       the action of each attribute, from Table E.1-1 (as shipped by dicom-anonymizer), options applied
    pseudonyms.py  HMAC-derived UIDs, patient pseudonyms and date shifts: the same input, the same output
    burned_in.py   which instances may carry burned-in identifiers and so are withheld
"""
