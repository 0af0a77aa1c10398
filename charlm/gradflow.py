"""`python -m charlm.gradflow models=[rnn,lstm,gru,transformer] out_dir=DIR steps=N`: gradient flow's entry point.

The measurement is charlm.studies.gradflow's."""

from charlm.studies.gradflow import main

if __name__ == "__main__":
    main()
